"""Ops: each file holds `<op>_ref` (the pure-torch spec), its autograd Function and the public function."""
