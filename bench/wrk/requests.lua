-- Replays a file of requests, one per line: METHOD <tab> PATH <tab> BODY
-- (BODY may be empty), cycling through them in order. Every request is
-- formatted once in init(), so wrk spends no time building them.
-- Usage: wrk -s requests.lua <url> -- <requests file>
-- At the end it prints one JSON line (prefix "RESULT ") for the harness.

local requests = {}
local index = 0

function init(args)
  local path = args[1]
  local file = assert(io.open(path, "r"))
  for line in file:lines() do
    local method, target, body = line:match("^([^\t]*)\t([^\t]*)\t?(.*)$")
    local headers = {}
    if body == "" then
      body = nil
    else
      headers["Content-Type"] = "application/json"
    end
    requests[#requests + 1] = wrk.format(method, target, headers, body)
  end
  file:close()
  assert(#requests > 0, "no requests in " .. path)
end

function request()
  index = index + 1
  if index > #requests then
    index = 1
  end
  return requests[index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,'
      .. '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
