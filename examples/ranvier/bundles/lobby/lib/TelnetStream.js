'use strict';

// What Ranvier writes to (Broadcast, prompts) over ranvier-telnet's TelnetSocket: a Ranvier
// TransportStream whose 'data' events are the lines the player typed.
const { TransportStream } = require('ranvier');
const { Sequences } = require('ranvier-telnet');

class TelnetStream extends TransportStream {
  attach(socket) {
    super.attach(socket);
    socket.on('data', (line) => this.emit('data', line));
    socket.on('error', (err) => this.emit('error', err));
  }

  get writable() {
    return Boolean(this.socket && this.socket.writable);
  }

  write(message, encoding = 'utf8') {
    if (this.writable) this.socket.write(message, encoding);
  }

  end(message) {
    if (this.writable) this.socket.end(message);
  }

  destroy() {
    this.socket.destroy();
  }

  /** socket.command('toggleEcho'): hide what the player types (passwords), or show it again. */
  executeToggleEcho() {
    this.socket.toggleEcho();
  }

  /** socket.command('goAhead') after a prompt, for clients that asked for GA or EOR. */
  executeGoAhead() {
    if (this.socket.gaMode && this.writable) this.socket.socket.write(Buffer.from([Sequences.IAC, this.socket.gaMode]));
  }
}

module.exports = TelnetStream;
