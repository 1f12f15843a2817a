// Validates Kubernetes objects in YAML files offline against the Kubernetes JSON schemas
// (npm kubernetes-models), and modelstated's flag files in ConfigMaps against the rule a
// follower enforces at start. Usage: node validate.mjs FILE.yaml...  Exit 1 if any object is
// invalid or of a kind it does not know.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import yaml from "js-yaml";

const models = join(dirname(fileURLToPath(import.meta.url)), "node_modules", "kubernetes-models");
let failures = 0;
let checked = 0;

// The flags of a ConfigMap's *.flags files together: a StatefulSet follower reads
// modelstated.flags and follower.flags, a node cache its one file. A follower that presents
// credentials to its upstream refuses to start without an --auth_policy of its own (or
// --follow_open_reads), since it would serve what they unlock to every caller.
function followerAccessError(doc) {
  if (doc.kind !== "ConfigMap") return null;
  const flags = Object.entries(doc.data ?? {})
    .filter(([name]) => name.endsWith(".flags"))
    .flatMap(([, text]) => text.split("\n").map((line) => line.trim().split("=")[0]));
  const has = (flag) => flags.includes(flag);
  if (!has("--follow")) return null;
  if (!has("--follow_token_file") && !has("--follow_tls_cert")) return null;
  if (has("--auth_policy") || has("--follow_open_reads")) return null;
  return "a follower with credentials for its upstream needs --auth_policy (modelstated refuses to start)";
}
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (doc == null) continue;
    const where = `${file}: ${doc.kind ?? "?"}/${doc.metadata?.name ?? "?"}`;
    if (typeof doc.apiVersion !== "string" || typeof doc.kind !== "string") {
      console.error(`${where}: missing apiVersion or kind`);
      failures++;
      continue;
    }
    // "apps/v1" -> apps/v1/StatefulSet.mjs; "v1" -> v1/Service.mjs
    const path = join(models, doc.apiVersion, `${doc.kind}.mjs`);
    let Model;
    try {
      Model = (await import(path))[doc.kind];
    } catch {
      console.error(`${where}: unknown apiVersion/kind ${doc.apiVersion}/${doc.kind}`);
      failures++;
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
    } catch (error) {
      console.error(`${where}: ${error.message}`);
      failures++;
    }
    const followerError = followerAccessError(doc);
    if (followerError) {
      console.error(`${where}: ${followerError}`);
      failures++;
    }
  }
}
console.log(`${checked} objects valid, ${failures} invalid`);
process.exit(failures > 0 || checked === 0 ? 1 : 0);
