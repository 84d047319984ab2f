// The line-driven client of echo.py, on grpc-js with @grpc/grpc-js-xds (a second, independent
// xDS client): `node echo.js TARGET` keeps one channel to TARGET (an xds:/// target resolved
// through $GRPC_XDS_BOOTSTRAP) for its whole life, reads lines "METHOD COUNT [key=value ...]"
// from stdin and prints, per line, a JSON object counting the answers by server name and the
// failures by status code. Modules come from $NODE_PATH.
const grpc = require('@grpc/grpc-js');
require('@grpc/grpc-js-xds').register();
const readline = require('readline');

const client = new grpc.Client(process.argv[2], grpc.credentials.createInsecure());
const codes = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function call(method, metadata) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + 5000);
    client.makeUnaryRequest(method, (b) => b, (b) => b, Buffer.alloc(0), metadata, { deadline },
      (err, reply) => resolve(err ? 'status:' + codes[err.code] : reply.toString()));
  });
}

(async () => {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const parts = line.trim().split(/\s+/);
    if (!parts[0]) continue;
    const metadata = new grpc.Metadata();
    for (const p of parts.slice(2)) {
      const i = p.indexOf('=');
      metadata.add(p.slice(0, i), p.slice(i + 1));
    }
    const counts = {};
    for (let n = 0; n < Number(parts[1]); n++) {
      const key = await call(parts[0], metadata);
      counts[key] = (counts[key] || 0) + 1;
    }
    console.log(JSON.stringify(counts));
  }
  client.close();
  process.exit(0);
})();
