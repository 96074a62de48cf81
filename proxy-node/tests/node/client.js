// node-postgres, unmodified, through the Airlock proxy. Connection settings come from
// AIRLOCK_PG{HOST,PORT,USER,PASSWORD,DATABASE}; the results are printed as one JSON object for
// proxy-node/tests/node_client.rs to check.
"use strict";

const { Client } = require("pg");

function env(name) {
  const v = process.env[name];
  if (v === undefined || v === "") {
    throw new Error(`${name} is not set`);
  }
  return v;
}

async function main() {
  const client = new Client({
    host: env("AIRLOCK_PGHOST"),
    port: Number(env("AIRLOCK_PGPORT")),
    user: env("AIRLOCK_PGUSER"),
    password: env("AIRLOCK_PGPASSWORD"),
    database: env("AIRLOCK_PGDATABASE"),
    ssl: false,
    connectionTimeoutMillis: 10000,
  });
  await client.connect();
  const out = {};
  try {
    // Simple protocol: a query without parameters.
    const simple = await client.query("SELECT item FROM orders ORDER BY id");
    out.simple = simple.rows.map((r) => r.item);

    // Extended protocol: Parse/Bind/Execute with a parameter, unnamed and then named.
    const param = await client.query("SELECT item, $1::int + 1 AS next FROM orders WHERE id = $1", [1]);
    out.parameterized = param.rows;
    const named = [];
    for (const id of [1, 1]) {
      const r = await client.query({ name: "by_id", text: "SELECT item FROM orders WHERE id = $1", values: [id] });
      named.push(r.rows[0].item);
    }
    out.named = named;

    // A transaction that commits a write with parameters.
    await client.query("BEGIN");
    await client.query("INSERT INTO orders (id, item) VALUES ($1, $2)", [2, "pear"]);
    const inTx = await client.query("SELECT count(*)::int AS n FROM orders");
    await client.query("COMMIT");
    out.transaction = { countInside: inTx.rows[0].n };

    // A transaction rolled back leaves nothing behind.
    await client.query("BEGIN");
    await client.query("INSERT INTO orders (id, item) VALUES ($1, $2)", [3, "plum"]);
    await client.query("ROLLBACK");

    // A statement the policy denies: SQLSTATE 42501, and the session stays usable.
    try {
      await client.query("DROP TABLE orders");
      out.denied = { code: null };
    } catch (e) {
      out.denied = { code: e.code, message: e.message };
    }
    // Denied in the extended protocol too.
    try {
      await client.query({ text: "CREATE TABLE stolen AS SELECT * FROM orders WHERE id = $1", values: [1] });
      out.deniedExtended = { code: null };
    } catch (e) {
      out.deniedExtended = { code: e.code };
    }
    const after = await client.query("SELECT count(*)::int AS n FROM orders");
    out.afterDenied = after.rows[0].n;
  } finally {
    await client.end();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => {
  process.stderr.write(`node client failed: ${e.stack || e}\n`);
  process.exit(1);
});
