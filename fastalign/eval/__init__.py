"""fastalign.eval."""
