-- wrk script that sends a different bearer token with every request, in file order:
--   wrk ... -s rotate.lua URL -- TOKENS_FILE [STOP_AFTER]
-- TOKENS_FILE holds one token per line. With STOP_AFTER > 0 the thread stops once that many
-- responses arrived (at most -c more requests are in flight then; they wrap to the file's start).
-- done() prints one JSON line for bench/bench.py, including how often the list wrapped (a wrap
-- means later requests reused tokens, i.e. could hit a cache): run with -t1.

-- Globals, not locals: done() reads them through thread:get().
tokens, count, index, wrapped = {}, 0, 0, 0
stop_after, responses = 0, 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      count = count + 1
      tokens[count] = "Bearer " .. line
    end
  end
  stop_after = tonumber(args[2] or "0") or 0
  if stop_after <= 0 then
    response = nil -- wrk then skips response parsing
  end
end

function request()
  index = index + 1
  if index > count then
    index = 1
    wrapped = wrapped + 1
  end
  return wrk.format(nil, nil, { ["Authorization"] = tokens[index] })
end

function response(status, headers, body)
  responses = responses + 1
  if responses >= stop_after then
    wrk.thread:stop()
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local sent, wraps, loaded = 0, 0, 0
  for _, t in ipairs(threads) do
    sent = sent + (t:get("index") or 0) + (t:get("wrapped") or 0) * (t:get("count") or 0)
    wraps = wraps + (t:get("wrapped") or 0)
    loaded = loaded + (t:get("count") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"mean_us":%.1f,"max_us":%.0f,"err_connect":%d,"err_read":%d,"err_write":%d,' ..
    '"err_status":%d,"err_timeout":%d,"tokens_loaded":%d,"requests_sent":%d,"wraps":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status,
    e.timeout, loaded, sent, wraps))
end
