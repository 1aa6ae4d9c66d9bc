'use strict';

// A new name: a password twice, then the account and its one character, in the starting room.
const { Account, Logger, Player } = require('ranvier');

/** Asks with echo off (the password is not shown) and gives the line to then(). */
function askHidden(socket, question, then) {
  socket.write(question);
  socket.command('toggleEcho');
  socket.once('data', (data) => {
    socket.command('toggleEcho');
    socket.write('\r\n');
    then(data.toString().trim());
  });
}

module.exports = {
  event: (state) => (socket, { name }) => {
    askHidden(socket, `${name} is a new name here. Choose a password (8 characters or more): `, (password) => {
      if (password.length < 8) {
        socket.write('That is too short.\r\n');
        return socket.emit('new-account', socket, { name });
      }
      askHidden(socket, 'The same again, to be sure: ', async (again) => {
        if (again !== password) {
          socket.write('Those two differ.\r\n');
          return socket.emit('new-account', socket, { name });
        }
        try {
          const account = new Account({ username: name });
          account.setPassword(password); // hashes and saves the account
          account.addCharacter(name);
          account.save();
          state.AccountManager.addAccount(account);
          const player = new Player({ name, account });
          player.room = state.RoomManager.getRoom(state.Config.get('startingRoom'));
          await state.PlayerManager.save(player);
          Logger.log(`login: new account ${name}`);
          socket.emit('enter', socket, { account });
        } catch (err) {
          Logger.error(`login: cannot create ${name}: ${err.message}`);
          socket.end('Your account cannot be made right now. Bye!\r\n');
        }
      });
    });
  },

  askHidden,
};
