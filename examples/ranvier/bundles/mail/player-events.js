'use strict';

// At login, the mail notices kept while the player was away.
module.exports = {
  listeners: {
    login: (state) => function () {
      if (state.Mail) state.Mail.greet(this);
    },
  },
};
