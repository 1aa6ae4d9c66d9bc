'use strict';

const { Broadcast } = require('ranvier');

module.exports = {
  usage: 'quit',
  command: () => (args, player) => {
    Broadcast.sayAt(player, 'Goodbye!');
    player.socket.end();
  },
};
