// memtrace's JS heap agent, compiled in the target under the name
// memtrace-jsheap-agent.js (so that memtrace can leave its own objects out of the
// profile) by a bootstrap that memtrace evaluates through the inspector and that first
// closes the listener memtrace opened.
//
// It samples the V8 heap through an in-process inspector session (which, unlike the
// network listener, reaches no one outside the process), and answers memtrace over a
// Unix socket that memtrace listens on. It is its own watchdog: when that socket closes
// for any reason (memtrace stopped, crashed or was SIGKILLed), it stops sampling,
// disconnects the session and drops every reference it made. Its handles are unref'd:
// it never keeps the target alive. It evaluates nothing it receives.
//
// Several memtraces share one agent (V8 has one sampling profiler per isolate); sampling
// stops when the last one leaves.
(function memtraceJsHeapAgent(load, options) {
  'use strict';
  const KEY = Symbol.for('memtrace.jsheap.agent');
  const MAX_COMMAND = 64;
  let agent = globalThis[KEY];
  if (!agent || agent.stopped) {
    try {
      agent = start(options.interval);
    } catch (err) {
      const socket = load('net').connect(options.socket);
      socket.unref();
      socket.on('error', () => socket.destroy());
      socket.end(JSON.stringify({ hello: options.token, error: String((err && err.message) || err) }) + '\n');
      return 'failed';
    }
    Object.defineProperty(globalThis, KEY, { value: agent, configurable: true, enumerable: false, writable: false });
  }
  agent.serve(options.socket, options.token);
  return 'ok';

  function start(interval) {
    const inspector = load('inspector');
    const net = load('net');
    const session = new inspector.Session();
    session.connect();
    const self = { interval, stopped: false, clients: new Set(), serve, stop };
    try {
      post('HeapProfiler.startSampling', { samplingInterval: interval });
    } catch (err) {
      session.disconnect();
      throw err;
    }
    return self;

    // The in-process session answers synchronously.
    function post(method, params) {
      let failure = null;
      let result = null;
      session.post(method, params, (err, res) => {
        failure = err;
        result = res;
      });
      if (failure) throw failure;
      return result;
    }

    // An exception thrown from a socket callback would end the target: each callback
    // catches everything and closes its socket instead.
    function guarded(socket, callback) {
      return (...args) => {
        try {
          callback(...args);
        } catch (_) {
          socket.destroy();
        }
      };
    }

    function serve(path, token) {
      const socket = net.connect(path);
      socket.unref();
      socket.setEncoding('utf8');
      self.clients.add(socket);
      let pending = '';
      socket.on('connect', guarded(socket, () => {
        const hello = { hello: token, pid: process.pid, interval: self.interval, node: process.version, clients: self.clients.size };
        socket.write(JSON.stringify(hello) + '\n');
      }));
      socket.on('data', guarded(socket, (chunk) => {
        pending += chunk;
        let nl;
        while ((nl = pending.indexOf('\n')) >= 0) {
          const command = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          answer(socket, command);
        }
        if (pending.length > MAX_COMMAND) socket.destroy();
      }));
      socket.on('error', () => socket.destroy());
      socket.on('close', () => {
        self.clients.delete(socket);
        if (self.clients.size === 0) stop();
      });
    }

    function answer(socket, command) {
      if (command !== 'snapshot') {
        socket.destroy();
        return;
      }
      let reply;
      try {
        const profile = post('HeapProfiler.getSamplingProfile').profile;
        const m = process.memoryUsage();
        reply = {
          profile: { nodes: flatten(profile.head), samples: profile.samples || [] },
          memory: { heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, arrayBuffers: m.arrayBuffers },
          interval: self.interval,
        };
      } catch (err) {
        reply = { error: String((err && err.message) || err) };
      }
      socket.write(JSON.stringify(reply) + '\n');
    }

    // Parents before children, each with its parent's id; iterative (no recursion on a
    // depth the application's stacks decide).
    function flatten(head) {
      const nodes = [];
      const todo = [[head, 0]];
      while (todo.length > 0) {
        const [node, parent] = todo.pop();
        const f = node.callFrame;
        nodes.push({
          id: node.id,
          parent,
          callFrame: { functionName: f.functionName, url: f.url, lineNumber: f.lineNumber },
          selfSize: node.selfSize,
        });
        for (const child of node.children || []) todo.push([child, node.id]);
      }
      return nodes;
    }

    function stop() {
      if (self.stopped) return;
      self.stopped = true;
      for (const socket of self.clients) socket.destroy();
      self.clients.clear();
      try {
        post('HeapProfiler.stopSampling');
      } catch (_) {
        // Already stopped (e.g. by a debugger): nothing to undo.
      }
      try {
        session.disconnect();
      } catch (_) {
        // Disconnected already.
      }
      if (globalThis[KEY] === self) delete globalThis[KEY];
    }
  }
})
