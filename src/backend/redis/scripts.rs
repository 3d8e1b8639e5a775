//! The key table, the timeouts and the Lua scripts: each write is one script, so the task, the
//! stream entry, the head and the idempotency key change together or not at all.

use std::time::Duration;

pub(super) const STREAM_KEY: &str = "{taskstream}:events";
pub(super) const TASKS_KEY: &str = "{taskstream}:tasks";
pub(super) const HEAD_KEY: &str = "{taskstream}:head";
pub(super) const IDEMPOTENCY_PREFIX: &str = "{taskstream}:idempotency:";

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
/// KEYS: stream, tasks, head[, idempotency key]. ARGV: task id, the stored task JSON the update
/// was computed from ('' for none), the new task JSON, the event data, MAXLEN, key TTL, max tasks.
pub(super) const UPDATE_LUA: &str = r"
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then return {'again', first} end
end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[2] then return {'conflict'} end
if ARGV[2] == '' and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[7]) then return {'full'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'k', 'u', 't', ARGV[1], 'p', prev, 'd', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], id)
if KEYS[4] then redis.call('SET', KEYS[4], id .. '\n' .. ARGV[3], 'NX', 'EX', ARGV[6]) end
return {'ok', id}
";

/// Removes a task and appends its `task_deleted`: `{'ok', id}` or `{'missing'}`.
/// KEYS: stream, tasks, head. ARGV: task id, the event data, MAXLEN.
pub(super) const DELETE_LUA: &str = r"
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {'missing'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
  'k', 'd', 't', ARGV[1], 'p', prev, 'd', ARGV[2])
redis.call('SET', KEYS[3], id)
return {'ok', id}
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
