"""Trust on the model-update channel: Ed25519 keys (`keys`), the signed documents that travel
(`documents`), and what a device checks before it loads a model or believes a notice (`verifier`)."""
