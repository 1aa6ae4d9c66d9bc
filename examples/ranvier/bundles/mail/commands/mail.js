'use strict';

const { Broadcast } = require('ranvier');

module.exports = {
  usage: 'mail ADDRESS TEXT',
  command: (state) => (args, player) => {
    const [to, ...words] = args.trim().split(/\s+/);
    if (!to || words.length === 0) return Broadcast.sayAt(player, 'Usage: mail ADDRESS TEXT');
    return state.Mail.mailFrom(player, to, args.trim().slice(to.length).trim());
  },
};
