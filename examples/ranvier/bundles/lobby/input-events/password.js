'use strict';

// A known name: its password, three tries.
const { askHidden } = require('./new-account');

module.exports = {
  event: (state) => (socket, { account, tries }) => {
    askHidden(socket, 'Password: ', (password) => {
      if (account.checkPassword(password)) return socket.emit('enter', socket, { account });
      if (tries <= 1) return socket.end('Wrong password. Bye!\r\n');
      socket.write('Wrong password.\r\n');
      socket.emit('password', socket, { account, tries: tries - 1 });
    });
  },
};
