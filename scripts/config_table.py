"""Print the README's config table from the schema: python scripts/config_table.py (paste over the table)."""

from raysft.config import describe

print("| key | default | meaning |")
print("|---|---|---|")
for key, default, doc in describe():
    print(f"| `{key}` | `{default}` | {doc} |")
