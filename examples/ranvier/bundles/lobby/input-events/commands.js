'use strict';

// The command loop: each line the player types runs one command, in order; a command that
// returns a promise (the mail commands) is waited for before the next line and the prompt.
const { Broadcast, Logger } = require('ranvier');

module.exports = {
  event: (state) => function (player) {
    const socket = this;
    let chain = Promise.resolve();
    socket.on('data', (data) => {
      const line = data.toString().trim();
      chain = chain
        .then(() => run(state, player, line))
        .catch((err) => {
          Logger.error(`command '${line}' of ${player.name}: ${err.stack || err}`);
          Broadcast.sayAt(player, 'Something went wrong with that command.');
        })
        .then(() => {
          if (player.socket === socket) Broadcast.prompt(player);
        });
    });
  },
};

function run(state, player, line) {
  if (!line) return;
  const word = line.split(/\s/, 1)[0].toLowerCase();
  const command = state.CommandManager.get(word) || state.CommandManager.find(word);
  if (!command || command.requiredRole > player.role) {
    return Broadcast.sayAt(player, `There is no command '${word}' here; 'help' lists them.`);
  }
  return command.execute(line.slice(word.length).trim(), player, word);
}
