"""One readable file per algorithm: behaviour cloning, experts and demonstration collection."""
