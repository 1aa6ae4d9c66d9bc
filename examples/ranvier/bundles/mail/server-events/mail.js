'use strict';

// The game's one mail engine: made when the game starts, stopped when it shuts down.
const { Logger } = require('ranvier');
const MailService = require('../lib/MailService');

module.exports = {
  listeners: {
    startup: (state) => function () {
      state.Mail = new MailService(state);
      state.Mail.start().catch((err) => Logger.error(`mail: cannot start, the game runs without mail: ${err.message}`));
    },

    shutdown: (state) => function () {
      if (!state.Mail) return;
      state.Mail.stop().catch((err) => Logger.error(`mail: stop: ${err.message}`));
    },
  },
};
