//! The key table, the timeouts and the Lua scripts: each write is one script, so the task, the
//! stream entry, the head and the idempotency key change together or not at all.

use std::time::Duration;

pub(super) const STREAM_KEY: &str = "{taskstream}:events";
pub(super) const TASKS_KEY: &str = "{taskstream}:tasks";
pub(super) const HEAD_KEY: &str = "{taskstream}:head";
pub(super) const IDEMPOTENCY_PREFIX: &str = "{taskstream}:idempotency:";
// The compacted catch-up's index (issue 15). Members are `<padded id>:<task id>`, every score 0,
// so the sorted sets order by id (ZRANGEBYLEX); the padded id is both groups in 20 digits.
pub(super) const POSITIONS_KEY: &str = "{taskstream}:positions";
pub(super) const LATEST_KEY: &str = "{taskstream}:latest";
pub(super) const TOMBSTONES_KEY: &str = "{taskstream}:tombstones";
pub(super) const CATCHUP_FLOOR_KEY: &str = "{taskstream}:catchup_floor";
pub(super) const TOMBSTONE_FLOOR_KEY: &str = "{taskstream}:tombstone_floor";
/// `<20 digits>-<20 digits>`: the length of a padded id, before its `:`.
pub(super) const PADDED_ID: usize = 41;

/// The index kept beside every write: the task's latest id in `positions` and in `latest` (or,
/// once deleted, in `tombstones`, capped at ARGV[n] by dropping the oldest and raising
/// `tombstone_floor`); `catchup_floor` is set once, to the head before the first write that kept
/// the index, so ids from before it (written by an older version) are never placed.
/// KEYS[4..8]: positions, latest, tombstones, catchup floor, tombstone floor.
const INDEX_LUA: &str = r"
local function pad(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #sq) .. sq
end
local function index(task, id, prev, deleted, max_tombstones)
  redis.call('SET', KEYS[7], pad(prev), 'NX')
  local old = redis.call('HGET', KEYS[4], task)
  if old then
    redis.call('ZREM', KEYS[5], old .. ':' .. task)
    redis.call('ZREM', KEYS[6], old .. ':' .. task)
  end
  local p = pad(id)
  redis.call('HSET', KEYS[4], task, p)
  if not deleted then
    redis.call('ZADD', KEYS[5], 0, p .. ':' .. task)
    return
  end
  redis.call('ZADD', KEYS[6], 0, p .. ':' .. task)
  while redis.call('ZCARD', KEYS[6]) > max_tombstones do
    local dropped = redis.call('ZPOPMIN', KEYS[6])[1]
    redis.call('HDEL', KEYS[4], string.sub(dropped, 43))
    redis.call('SET', KEYS[8], string.sub(dropped, 1, 41))
  end
end
";

/// A request never waits longer than this for Redis: past it, it answers 503.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one `XREAD` waits for new entries; also how soon a silently dead connection shows.
pub(super) const BLOCK: Duration = Duration::from_secs(2);
/// Entries per `XREAD` or replay page: bounds the memory one read holds (entries are < 17 KiB).
pub(super) const PAGE: usize = 256;
/// Optimistic updates of one task retried at most this often before answering 503.
pub(super) const MAX_ATTEMPTS: usize = 32;
/// How long a starting node waits for its reader to find the stream's head before it accepts
/// connections anyway (degraded).
pub(super) const STARTUP_WAIT: Duration = Duration::from_secs(3);

/// Appends an update: `{'ok', id}`, `{'again', first answer}` for a used Idempotency-Key,
/// `{'conflict'}` when the task changed since the caller read it (the caller reads and retries),
/// or `{'full'}` for a new task when the hash already holds `--max-tasks` (the cluster's count,
/// checked here so two nodes cannot both add the last one).
/// KEYS: stream, tasks, head, the index's five keys[, idempotency key]. ARGV: task id, the stored
/// task JSON the update was computed from ('' for none), the new task JSON, the event data,
/// MAXLEN, key TTL, --tombstones, --max-tasks.
pub(super) fn update_lua() -> String {
    format!("{INDEX_LUA}{UPDATE_BODY}")
}

const UPDATE_BODY: &str = r"
if KEYS[9] then
  local first = redis.call('GET', KEYS[9])
  if first then return {'again', first} end
end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[2] then return {'conflict'} end
if ARGV[2] == '' and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[8]) then return {'full'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'k', 'u', 't', ARGV[1], 'p', prev, 'd', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], id)
index(ARGV[1], id, prev, false, tonumber(ARGV[7]))
if KEYS[9] then redis.call('SET', KEYS[9], id .. '\n' .. ARGV[3], 'NX', 'EX', ARGV[6]) end
return {'ok', id}
";

/// Removes a task and appends its `task_deleted`: `{'ok', id}` or `{'missing'}`.
/// KEYS: stream, tasks, head, the index's five keys. ARGV: task id, the event data, MAXLEN,
/// --tombstones.
pub(super) fn delete_lua() -> String {
    format!("{INDEX_LUA}{DELETE_BODY}")
}

const DELETE_BODY: &str = r"
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {'missing'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
  'k', 'd', 't', ARGV[1], 'p', prev, 'd', ARGV[2])
redis.call('SET', KEYS[3], id)
index(ARGV[1], id, prev, true, tonumber(ARGV[4]))
return {'ok', id}
";

/// The compacted catch-up after ARGV[1] (a padded id), read together: `{head, catch-up floor,
/// tombstone floor, latest members after it, tombstone members after it, the tasks' JSON in the
/// order of the latest members}`. KEYS: head, tasks, the index's five keys.
pub(super) const CATCH_UP_LUA: &str = r"
local after = '[' .. ARGV[1] .. ';'
local latest = redis.call('ZRANGEBYLEX', KEYS[4], after, '+')
local tasks = {}
for i, member in ipairs(latest) do
  tasks[i] = redis.call('HGET', KEYS[2], string.sub(member, 43)) or ''
end
return {redis.call('GET', KEYS[1]) or '0-0', redis.call('GET', KEYS[6]) or '',
        redis.call('GET', KEYS[7]) or '', latest,
        redis.call('ZRANGEBYLEX', KEYS[5], after, '+'), tasks}
";

/// `{newest id, entries after ARGV[1]}`, read together. KEYS: stream, head. ARGV: id, COUNT.
pub(super) const READ_LUA: &str = r"
return {redis.call('GET', KEYS[2]) or '0-0',
        redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
";

/// `{newest id or '', [task id, task JSON, ...]}`, read together. KEYS: tasks, head.
pub(super) const SNAPSHOT_LUA: &str = r"
return {redis.call('GET', KEYS[2]) or '', redis.call('HGETALL', KEYS[1])}
";
