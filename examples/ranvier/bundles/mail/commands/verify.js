'use strict';

const { Broadcast } = require('ranvier');

module.exports = {
  usage: 'verify CODE',
  command: (state) => (args, player) => {
    const code = args.trim();
    if (!code) return Broadcast.sayAt(player, 'Usage: verify CODE (the code in the mail setemail sent)');
    return state.Mail.verify(player, code);
  },
};
