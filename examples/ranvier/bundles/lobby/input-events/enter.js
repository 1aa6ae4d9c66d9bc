'use strict';

// Logged in: the character enters the game (or takes over its own connection), 'login' is
// emitted on the player (the mail bundle shows what came while it was away), then commands.
const { Broadcast, Logger } = require('ranvier');

module.exports = {
  event: (state) => async (socket, { account }) => {
    const name = account.username;
    let player = state.PlayerManager.getPlayer(name);
    if (player) {
      const old = player.socket;
      player.socket = socket;
      old.end('Your character was taken over by another connection.\r\n');
    } else {
      try {
        player = await state.PlayerManager.loadPlayer(state, account, name);
      } catch (err) {
        Logger.error(`login: cannot load ${name}: ${err.message}`);
        return socket.end('Your character cannot be loaded right now. Bye!\r\n');
      }
      player.socket = socket;
      player.hydrate(state);
    }
    socket.on('close', async () => {
      if (player.socket !== socket) return; // taken over
      await state.PlayerManager.save(player).catch((err) => Logger.error(`saving ${name}: ${err.message}`));
      if (player.socket !== socket) return; // taken over while saving
      state.PlayerManager.removePlayer(player);
      Logger.log(`login: ${name} left`);
    });
    Logger.log(`login: ${name} entered`);
    Broadcast.sayAt(player, `Welcome, ${name}. ${player.room.title}: ${player.room.description}`);
    player.emit('login');
    socket.emit('commands', player);
    Broadcast.prompt(player);
  },
};
