"""Shipped source profiles (TOML): which CRM tables and columns feed the canonical events."""
