"""Build profiles (``*.json``): data only, read by :mod:`qvggt_export.engine.profiles`; installed as
``qvggt_export.engine.profile_data``."""
