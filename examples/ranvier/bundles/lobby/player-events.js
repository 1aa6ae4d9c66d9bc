'use strict';

// player.save() emits 'save': the player's file is written through the 'players' entity loader.
module.exports = {
  listeners: {
    save: (state) => async function (callback) {
      await state.PlayerManager.save(this);
      if (typeof callback === 'function') callback();
    },
  },
};
