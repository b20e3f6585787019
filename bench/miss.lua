-- All-miss workload: every request asks for an address never asked before (each one a partner call).
local key = os.getenv("API_KEY")
local run = os.getenv("RUN_ID") or tostring(os.time())
local headers
local c = 0

function init(args)
  headers = { ["x-api-key"] = key }
end

function request()
  c = c + 1
  return wrk.format("GET", "/customers/miss-" .. run .. "-" .. c .. "%40example.com/credentials", headers)
end
