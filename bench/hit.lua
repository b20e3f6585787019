-- Cache-hit workload: cycles over HOT_EMAILS (default 1000) addresses, authenticated with API_KEY.
local key = os.getenv("API_KEY")
local n = tonumber(os.getenv("HOT_EMAILS") or "1000")
local requests = {}
local i = 0

function init(args)
  for k = 1, n do
    requests[k] = wrk.format("GET", "/customers/hot-" .. k .. "%40example.com/credentials", { ["x-api-key"] = key })
  end
end

function request()
  i = i % n + 1
  return requests[i]
end
