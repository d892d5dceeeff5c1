-- Echoes the request as JSON: method, path, params and body (like echo.py).
--   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.lua&c=3'
-- The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return string.format('\\u%04x', c:byte())
  end) .. '"'
end

local body = io.read('*a') or ''
io.write('Content-Type: application/json\n\n')
io.write('{"body": ', json_string(body),
         ', "method": ', json_string(os.getenv('REQUEST_METHOD')),
         ', "params": ', os.getenv('HAIKU_PARAMS'),
         ', "path": ', json_string(os.getenv('PATH_INFO')), '}\n')
