# Top-level await works: the handler runs on an asyncio loop.
#   curl 'http://localhost:8080/?x-haiku-handler=sleep.py&ms=200'
import asyncio

ms = int(req.query.get('ms', '100'))
await asyncio.sleep(ms / 1000)
res.write_head(200, {'Content-Type': 'text/plain'})
res.end(f'Slept {ms} ms\n')
