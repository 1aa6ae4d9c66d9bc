'use strict';

const { Broadcast } = require('ranvier');

module.exports = {
  usage: 'setemail ADDRESS',
  command: (state) => (args, player) => {
    const address = args.trim();
    if (!address || /\s/.test(address)) return Broadcast.sayAt(player, 'Usage: setemail ADDRESS');
    return state.Mail.requestVerification(player, address);
  },
};
