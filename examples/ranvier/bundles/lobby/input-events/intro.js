'use strict';

// A new connection: the greeting, then the name.
module.exports = {
  event: (state) => (socket) => {
    socket.write(`Welcome to ${state.Config.get('name', 'the game')}!\r\n`);
    socket.emit('login', socket);
  },
};
