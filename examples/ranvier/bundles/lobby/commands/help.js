'use strict';

const { Broadcast } = require('ranvier');

module.exports = {
  usage: 'help',
  command: (state) => (args, player) => {
    const usages = [...new Set(state.CommandManager.commands.values())]
      .filter((command) => command.requiredRole <= player.role)
      .map((command) => command.usage)
      .sort();
    Broadcast.sayAt(player, `Commands: ${usages.join(', ')}`);
  },
};
