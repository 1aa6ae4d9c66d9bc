'use strict';

// The telnet server: each connection becomes a TelnetStream that starts at the 'intro' input event.
const { Logger } = require('ranvier');
const { TelnetServer, TelnetSocket } = require('ranvier-telnet');
const TelnetStream = require('../lib/TelnetStream');

let server = null;
const streams = new Set();

module.exports = {
  listeners: {
    startup: (state) => function (commander) {
      server = new TelnetServer((connection) => {
        const telnet = new TelnetSocket();
        telnet.attach(connection);
        const stream = new TelnetStream();
        stream.attach(telnet);
        stream.on('error', (err) => Logger.warn(`telnet: ${err.message}`));
        streams.add(stream);
        stream.on('close', () => streams.delete(stream));
        state.InputEventManager.attach(stream);
        stream.emit('intro', stream);
      }).netServer;
      server.on('error', (err) => {
        Logger.error(`telnet: cannot listen on ${commander.host}:${commander.port}: ${err.message}`);
        process.exit(1);
      });
      server.listen(Number(commander.port), commander.host, () => {
        Logger.log(`telnet: listening on ${commander.host}:${server.address().port}`);
      });
    },

    shutdown: () => function () {
      if (server) server.close();
      for (const stream of streams) {
        stream.end('The game is shutting down. Bye!\r\n');
        setTimeout(() => stream.destroy(), 1_000).unref(); // a client that keeps its side open
      }
    },
  },
};
