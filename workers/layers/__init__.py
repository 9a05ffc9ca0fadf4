"""Model building blocks; the parallel ones own their sharding and their collectives."""
