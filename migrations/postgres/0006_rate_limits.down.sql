-- Reverts 0006_rate_limits: the releases before it kept rate limits in each replica's memory.
DROP TABLE rate_limit_buckets;
