'use strict';

// The name: an account of that name logs in (password), a new one is made (new-account).
// One account holds one character of the same name.
const { Data, Logger } = require('ranvier');

const NAME = /^[A-Za-z][A-Za-z0-9]{1,15}$/;

module.exports = {
  event: (state) => (socket) => {
    socket.write('What is your name? ');
    socket.once('data', async (data) => {
      const typed = data.toString().trim();
      if (!NAME.test(typed)) {
        socket.write('A name is 2 to 16 letters and digits, starting with a letter.\r\n');
        return socket.emit('login', socket);
      }
      const name = typed[0].toUpperCase() + typed.slice(1).toLowerCase();
      if (!Data.exists('account', name)) return socket.emit('new-account', socket, { name });
      try {
        const account = await state.AccountManager.loadAccount(name);
        socket.emit('password', socket, { account, tries: 3 });
      } catch (err) {
        Logger.error(`login: cannot load account ${name}: ${err.message}`);
        socket.end('That account cannot be loaded right now. Bye!\r\n');
      }
    });
  },
};
