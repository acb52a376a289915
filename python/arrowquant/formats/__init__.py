"""Output and input file formats (writers and readers), one subpackage each."""
