// Builds a subscribe message's `data` from a notice, with the same rules as the
// Rust service's direct mode (src/wechat/template.rs): each keyword's value is
// cut to its type's limit in characters (not bytes), a cut value keeps its
// beginning and ends with "…", numbers and times are never cut, an empty value
// is sent as "-". Pure functions, so the rules are tested without WeChat.
'use strict';

const ELLIPSIS = '…';

// Keyword types (the key minus its trailing digits) and their limits in
// characters; null: never cut.
const KEYWORD_TYPES = {
  character_string: 32,
  thing: 20,
  name: 10,
  phrase: 5,
  number: 32,
  letter: 32,
  symbol: 5,
  amount: null,
  date: null,
  time: null,
  phone_number: 17,
  car_number: 8,
};

const SOURCES = {
  miniprogram: '小程序',
  web: '网页',
  batch: '批量分配',
  public_pool: '公海',
};

const NEVER_CUT = ['customer_count', 'first_assigned_at', 'last_assigned_at'];

// The mapping used when TEMPLATE_DATA is not set (contract section 4's example).
const DEFAULT_DATA = {
  thing1: '{customer_names}',
  number2: '{customer_count}',
  name3: '{assigned_by}',
  time4: '{last_assigned_at}',
};

// Characters, not UTF-16 code units: "𠀀" is one character.
const chars = (s) => Array.from(s);

function keywordLimit(key) {
  const type = key.replace(/[0-9]+$/, '');
  if (type === key || !(type in KEYWORD_TYPES)) {
    throw new Error(`template keyword ${key}: unknown keyword type`);
  }
  return KEYWORD_TYPES[type];
}

function cut(value, limit) {
  const c = chars(value);
  if (limit == null || c.length <= limit) return value;
  return c.slice(0, Math.max(limit - 1, 0)).join('') + ELLIPSIS;
}

// `YYYY-MM-DD HH:mm` in the timestamp's own offset (no time zone conversion).
function shortTime(rfc3339) {
  const m = /^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2})/.exec(rfc3339 || '');
  return m ? `${m[1]} ${m[2]}` : '';
}

// Whole names joined by "、", as many as fit in `limit`, then "…".
function customerNames(notice, limit) {
  const names = (notice.customers || []).map((c) => String(c.name));
  const all = names.join('、');
  const complete = (notice.customer_count || names.length) <= names.length;
  if (limit == null || (chars(all).length <= limit && complete)) return all;
  let out = '';
  for (const name of names) {
    const candidate = out === '' ? name : `${out}、${name}`;
    if (chars(candidate).length + 1 > limit) break;
    out = candidate;
  }
  if (out === '') return cut(names[0] || '', limit);
  return out + ELLIPSIS;
}

function personName(p) {
  if (!p) return '';
  return p.name != null && p.name !== '' ? String(p.name) : String(p.user_id || '');
}

function placeholder(name, notice, limit) {
  switch (name) {
    case 'customer_names':
      return customerNames(notice, limit);
    case 'first_customer':
      return notice.customers && notice.customers[0] ? String(notice.customers[0].name) : '';
    case 'customer_count':
      return String(notice.customer_count);
    case 'assignee':
      return personName(notice.assignee);
    case 'assigned_by':
      return personName(notice.assigned_by);
    case 'source':
      return SOURCES[notice.source] || '';
    case 'first_assigned_at':
      return shortTime(notice.first_assigned_at);
    case 'last_assigned_at':
      return shortTime(notice.last_assigned_at);
    case 'notice_id':
      return String(notice.notice_id);
    default:
      throw new Error(`unknown placeholder {${name}}`);
  }
}

// Fills `pattern` from the notice and cuts it to `limit` (unless it is a lone
// number or time).
function render(pattern, notice, limit) {
  let loneUncut = false;
  let out = pattern.replace(/\{([a-z_]+)\}/g, (whole, name) => {
    loneUncut = pattern === whole && NEVER_CUT.includes(name);
    return placeholder(name, notice, limit);
  });
  if (!loneUncut) out = cut(out, limit);
  return out.trim() === '' ? '-' : out;
}

// The subscribe message's `data`: { thing1: { value: "…" }, … }.
function buildData(mapping, notice) {
  const data = {};
  for (const [key, pattern] of Object.entries(mapping)) {
    data[key] = { value: render(pattern, notice, keywordLimit(key)) };
  }
  return data;
}

module.exports = { buildData, render, cut, shortTime, keywordLimit, DEFAULT_DATA };
