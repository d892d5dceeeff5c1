# Echoes the request as JSON: method, path, params and body (like echo.py).
#   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.pl&c=3'
# The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
use strict;
use warnings;
use JSON::PP;

binmode STDIN;
my $body = do { local $/; <STDIN> } // '';
utf8::decode($body);
my $json = JSON::PP->new->utf8->canonical;
print "Content-Type: application/json\n\n";
print $json->encode({
    body   => $body,
    method => $ENV{REQUEST_METHOD},
    params => $json->decode($ENV{HAIKU_PARAMS}),
    path   => $ENV{PATH_INFO},
}), "\n";
