"""Device mesh (pp, dp, ep), expert-parallel dispatch/combine, ZeRO-1 and pipeline schedules,
applied to the plain model from outside."""
