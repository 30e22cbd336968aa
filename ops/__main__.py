from thaw.ops.cli import main

main()
