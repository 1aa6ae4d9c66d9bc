'use strict';

const { Broadcast, PlayerRoles } = require('ranvier');

module.exports = {
  usage: 'mailq',
  requiredRole: PlayerRoles.ADMIN,
  command: (state) => async (args, player) => {
    for (const line of await state.Mail.listing()) Broadcast.sayAt(player, line);
  },
};
