"""The credit ledger: grants (buckets), holds, and the entries that move credits."""
