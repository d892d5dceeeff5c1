# Writes to the console before and after the head; see each console mode:
#   curl -i 'http://localhost:8080/?x-haiku-handler=console.py&x-haiku-console=header'
#   curl 'http://localhost:8080/?x-haiku-handler=console.py&x-haiku-console=body'
#   curl -i --raw 'http://localhost:8080/?x-haiku-handler=console.py&x-haiku-console=trailer'
console.log('Before write_head')
res.write_head(200, {'Content-Type': 'text/plain'})
console.warn('After write_head')
print('printed', 42)
res.end('Hello, world!\n')
