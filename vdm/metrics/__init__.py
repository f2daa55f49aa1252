"""Sample-quality metrics (FID, KID) computed offline from feature arrays."""
