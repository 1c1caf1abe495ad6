'use strict';

// memtrace's demo service: an Express API with one known leak.
//
// GET /order   -> placeOrder -> rememberOrder(req): keeps every order, with a 1 MiB
//                 receipt buffer, in a module-level array that nothing ever trims.
// GET /catalog -> allocates a page of products and drops it (no leak).
//
// Run: node server.js (no flag needed: memtrace names JavaScript frames from V8's own
// heap, e.g. `rememberOrder server.js:30`; a perf map from --perf-basic-prof works too).

const express = require('express');

const HOST = process.env.HOST || '127.0.0.1';
const PORT = Number(process.env.PORT ?? 3000);

// glibc serves a large malloc with its own mmap unless the heap has room for it, and
// raises its mmap threshold (and, doubled, the heap's trim threshold) to the size of any
// mmapped chunk that is freed. Node frees a ~260 KiB chunk while it loads modules, so by
// the time we listen a 256 KiB buffer comes from the heap and even a 512 KiB one
// sometimes does. A 1 MiB receipt is always its own mmap. Receipts are never freed,
// which keeps the thresholds where they are.
const RECEIPT_BYTES = 1024 * 1024;
// The leak stops here so that the demo never takes the machine down.
const LEAK_CAP_BYTES = Number(process.env.LEAK_CAP_MB ?? 1200) * 1024 * 1024;

const recentOrders = [];
let leakedBytes = 0;

function rememberOrder(req) {
  if (leakedBytes + RECEIPT_BYTES > LEAK_CAP_BYTES) {
    return null;
  }
  const id = recentOrders.length + 1;
  // Filled, not zeroed: the pages are touched and RSS grows as in a real leak.
  const receipt = Buffer.alloc(RECEIPT_BYTES, id & 0xff);
  const order = { id, item: String(req.query.item ?? 'widget'), at: Date.now(), receipt };
  recentOrders.push(order);
  leakedBytes += RECEIPT_BYTES;
  if (leakedBytes + RECEIPT_BYTES > LEAK_CAP_BYTES) {
    console.error(`leak cap reached: ${recentOrders.length} orders, ${leakedBytes} bytes kept`);
  }
  return order;
}

function placeOrder(req, res) {
  const order = rememberOrder(req);
  res.json({ ok: true, id: order ? order.id : null });
}

function renderCatalog(req, res) {
  const page = Number(req.query.page ?? 1);
  const products = [];
  for (let i = 0; i < 50; i += 1) {
    products.push({ sku: `sku-${page}-${i}`, name: `Product ${i}`, price: (i * 7) % 100 });
  }
  // A temporary buffer below the mmap threshold: allocated and dropped.
  const scratch = Buffer.alloc(32 * 1024);
  scratch.write(JSON.stringify(products[0]));
  res.json({ page, products: products.slice(0, 10), scratch: scratch.length });
}

const app = express();
app.get('/order', placeOrder);
app.get('/catalog', renderCatalog);
app.get('/health', (req, res) => res.send('ok'));
app.get('/stats', (req, res) => {
  res.json({ orders: recentOrders.length, leakedBytes, rssBytes: process.memoryUsage().rss });
});

const server = app.listen(PORT, HOST, () => {
  const { port } = server.address();
  console.log(`leaky-service listening on http://${HOST}:${port} pid ${process.pid}`);
});
