"""Model definitions composed from common/ layers."""
