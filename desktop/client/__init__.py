"""The edge client: the answer modes (speculative, cloud-only, local), the connection, detokenizing."""
