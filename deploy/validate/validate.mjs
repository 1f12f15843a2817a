// Validates Kubernetes objects in YAML files offline against the Kubernetes JSON schemas
// (npm kubernetes-models). Usage: node validate.mjs FILE.yaml...  Exit 1 if any object is
// invalid or of a kind it does not know.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import yaml from "js-yaml";

const models = join(dirname(fileURLToPath(import.meta.url)), "node_modules", "kubernetes-models");
let failures = 0;
let checked = 0;
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
  }
}
console.log(`${checked} objects valid, ${failures} invalid`);
process.exit(failures > 0 || checked === 0 ? 1 : 0);
