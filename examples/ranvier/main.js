#!/usr/bin/env node
/*
 * examples/ranvier/main.js - starts a RanvierMUD 3 game with mudmail inside it.
 *
 *   npm ci && MUDMAIL_RELAY=127.0.0.1:2525 node main.js [--port 4000] [--host 127.0.0.1] [--data DIR]
 *
 * What RanvierMUD's own `ranvier` start-up script does (the ranviermud repository is a template,
 * not an npm package, so this is that script cut to what this game uses), plus a data directory
 * that may live elsewhere (--data, default ./data: accounts, players, and the mail spool) and a
 * graceful shutdown on SIGINT/SIGTERM, which is what lets the mail bundle put mail that is in
 * flight back in the spool. The game's bundles are in bundles/: `mail` (the mail commands and
 * the one MailEngine of the game) and `lobby` (telnet, login, one room: the part of a stock
 * Ranvier game this example needs).
 */
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const Ranvier = require('ranvier');

const root = __dirname;
const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '4000' },
    host: { type: 'string', default: '127.0.0.1' },
    data: { type: 'string', default: path.join(root, 'data') },
  },
});
const dataDir = path.resolve(opts.data);
for (const dir of ['account', 'player']) fs.mkdirSync(path.join(dataDir, dir), { recursive: true });

const config = JSON.parse(fs.readFileSync(path.join(root, 'ranvier.json'), 'utf8'));
config.dataPath = dataDir; // where bundles keep their own files (the mail bundle: its spool)
Ranvier.Config.load(config);
Ranvier.Data.setDataPath(dataDir + '/');
Ranvier.Logger.setLevel(process.env.LOG_LEVEL || 'info');

const GameState = {
  AccountManager: new Ranvier.AccountManager(),
  AreaBehaviorManager: new Ranvier.BehaviorManager(),
  AreaFactory: new Ranvier.AreaFactory(),
  AreaManager: new Ranvier.AreaManager(),
  AttributeFactory: new Ranvier.AttributeFactory(),
  ChannelManager: new Ranvier.ChannelManager(),
  CommandManager: new Ranvier.CommandManager(),
  Config: Ranvier.Config,
  EffectFactory: new Ranvier.EffectFactory(),
  HelpManager: new Ranvier.HelpManager(),
  InputEventManager: new Ranvier.EventManager(),
  ItemBehaviorManager: new Ranvier.BehaviorManager(),
  ItemFactory: new Ranvier.ItemFactory(),
  ItemManager: new Ranvier.ItemManager(),
  MobBehaviorManager: new Ranvier.BehaviorManager(),
  MobFactory: new Ranvier.MobFactory(),
  MobManager: new Ranvier.MobManager(),
  PartyManager: new Ranvier.PartyManager(),
  PlayerManager: new Ranvier.PlayerManager(),
  QuestFactory: new Ranvier.QuestFactory(),
  QuestGoalManager: new Ranvier.QuestGoalManager(),
  QuestRewardManager: new Ranvier.QuestRewardManager(),
  RoomBehaviorManager: new Ranvier.BehaviorManager(),
  RoomFactory: new Ranvier.RoomFactory(),
  RoomManager: new Ranvier.RoomManager(),
  SkillManager: new Ranvier.SkillManager(),
  SpellManager: new Ranvier.SkillManager(),
  ServerEventManager: new Ranvier.EventManager(),
  GameServer: new Ranvier.GameServer(),
  DataLoader: Ranvier.Data,
  EntityLoaderRegistry: new Ranvier.EntityLoaderRegistry(),
  DataSourceRegistry: new Ranvier.DataSourceRegistry(),
};

async function main() {
  // Bundle files (areas, help) are read from the game's directory, accounts and players from
  // the data directory: the one source GameData gets that root.
  const { GameData, ...bundleSources } = config.dataSources;
  GameState.DataSourceRegistry.load(require, root, bundleSources);
  GameState.DataSourceRegistry.load(require, dataDir, { GameData });
  GameState.EntityLoaderRegistry.load(GameState.DataSourceRegistry, config.entityLoaders);
  GameState.AccountManager.setLoader(GameState.EntityLoaderRegistry.get('accounts'));
  GameState.PlayerManager.setLoader(GameState.EntityLoaderRegistry.get('players'));

  GameState.BundleManager = new Ranvier.BundleManager(path.join(root, 'bundles') + '/', GameState);
  await GameState.BundleManager.loadBundles();
  GameState.ServerEventManager.attach(GameState.GameServer);
  GameState.GameServer.startup(opts); // the telnet bundle listens on opts.host:opts.port

  // The game's heartbeats. The player tick is also the mail bundle's: it calls mail.tick() once a minute.
  const ticks = [
    setInterval(() => {
      GameState.AreaManager.tickAll(GameState);
      GameState.ItemManager.tickAll();
    }, config.entityTickFrequency),
    setInterval(() => GameState.PlayerManager.emit('updateTick'), config.playerTickFrequency),
  ];

  let stopping = false;
  const shutdown = async (signal) => {
    if (stopping) return;
    stopping = true;
    Ranvier.Logger.log(`${signal}: shutting down`);
    for (const tick of ticks) clearInterval(tick);
    for (const player of GameState.PlayerManager.getPlayersAsArray()) {
      await GameState.PlayerManager.save(player).catch((err) => Ranvier.Logger.error(`saving ${player.name}: ${err.message}`));
    }
    // Bundles stop what they run ('shutdown' server events): the telnet server closes, the mail
    // engine puts mail in flight back in its spool. Then nothing is left and the process ends;
    // if something still runs after 10 s, it is cut short.
    GameState.GameServer.shutdown();
    setTimeout(() => {
      Ranvier.Logger.error('still busy 10 s after shutdown; exiting');
      process.exit(1);
    }, 10_000).unref();
  };
  process.once('SIGINT', () => shutdown('SIGINT'));
  process.once('SIGTERM', () => shutdown('SIGTERM'));
}

main().catch((err) => {
  Ranvier.Logger.error(`cannot start the game: ${err.stack || err}`);
  process.exit(1);
});
