"""Gates: the proxies, handle tables and links through which compartments call each other."""
