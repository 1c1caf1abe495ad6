// Preloaded by benches/node_trap_floor.sh's `sampling` mode (`node -r`): V8's sampling
// heap profiler, started in the process itself at memtrace's default interval, with no
// memtrace, to tell V8's own cost from the JS heap view's.
'use strict';
const inspector = require('inspector');
const session = new inspector.Session();
session.connect();
const start = () =>
  session.post('HeapProfiler.startSampling', { samplingInterval: Number(process.env.SAMPLE_BYTES || 524288) }, (err) => {
    if (err) console.error(err);
  });
// SAMPLE_AFTER_MS: start once the service's code is optimized, as memtrace does.
const after = Number(process.env.SAMPLE_AFTER_MS || 0);
if (after > 0) setTimeout(start, after).unref(); else start();
