-- wrk script: a shop's traffic. One request in ORDER_EVERY (default 120) places an
-- order (and leaks a 1 MiB receipt); the others browse the catalog.
local every = tonumber(os.getenv("ORDER_EVERY") or "120")
local n = 0

request = function()
  n = n + 1
  if n % every == 0 then
    return wrk.format("GET", "/order?item=widget-" .. n)
  end
  return wrk.format("GET", "/catalog?page=" .. (n % 20))
end
