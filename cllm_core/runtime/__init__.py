"""The runtime pieces every stage shares: the profile (`config`: its schema, its parsing, the presets and templates
it may name), loading models and choosing the device, precision, identities (what an artifact was made from), atomic
files and locks, typed records, and the guards that stop a wrong result.
"""
