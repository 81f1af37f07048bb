// A hand-made fake of the part of wx-server-sdk that quickstartFunctions uses:
// init, DYNAMIC_CURRENT_ENV, database() (collection().doc().get/set,
// serverDate) and
// openapi.subscribeMessage.send. It behaves as the real one does where the
// function depends on it: a missing document makes `doc().get()` throw, and a
// refused send throws an error carrying `errCode` and `errMsg`.
// The tests run with NODE_PATH=test/fake_modules so `require('wx-server-sdk')`
// in index.js resolves here.
'use strict';

const state = {
  collections: new Map(), // name -> Map(_id -> document)
  sent: [], // every subscribeMessage.send argument
  sendErrors: [], // errors to throw, first in first out
  initOptions: null,
};

function collection(name) {
  if (!state.collections.has(name)) state.collections.set(name, new Map());
  return state.collections.get(name);
}

const db = {
  serverDate: () => ({ $date: 'serverDate' }),
  collection(name) {
    const docs = collection(name);
    return {
      doc(id) {
        return {
          async get() {
            if (!docs.has(id)) {
              const err = new Error(`document.get:fail document with _id ${id} does not exist`);
              err.errCode = -502005;
              err.errMsg = err.message;
              throw err;
            }
            return { data: { ...docs.get(id) }, errMsg: 'document.get:ok' };
          },
          async set({ data }) {
            docs.set(id, { _id: id, ...data });
            return { _id: id, errMsg: 'document.set:ok' };
          },
        };
      },
    };
  },
};

module.exports = {
  __fake: true,
  DYNAMIC_CURRENT_ENV: Symbol('DYNAMIC_CURRENT_ENV'),
  init(options) {
    state.initOptions = options;
  },
  database: () => db,
  openapi: {
    subscribeMessage: {
      async send(message) {
        if (state.sendErrors.length > 0) {
          const { errCode, errMsg } = state.sendErrors.shift();
          const err = new Error(`errCode: ${errCode} | errMsg: ${errMsg}`);
          err.errCode = errCode;
          err.errMsg = errMsg;
          throw err;
        }
        state.sent.push(message);
        return { errCode: 0, errMsg: 'openapi.subscribeMessage.send:ok' };
      },
    },
  },
  // Test controls.
  __state: state,
  __reset() {
    state.collections.clear();
    state.sent.length = 0;
    state.sendErrors.length = 0;
  },
  __insert(name, doc) {
    collection(name).set(doc._id || `id-${collection(name).size + 1}`, doc);
  },
  __failNextSend(errCode, errMsg) {
    state.sendErrors.push({ errCode, errMsg });
  },
};
